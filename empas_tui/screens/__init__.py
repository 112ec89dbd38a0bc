"""The screens of the EMPAS TUI; each calls engine functions only, long work in thread workers."""
