"""The screens of the EMPAS TUI: each calls the job layer or the study catalogue in thread workers, and
moves to another screen through the app's ``open_*`` methods (no screen imports another)."""
