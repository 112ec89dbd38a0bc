"""Reusable widgets of the EMPAS TUI (no engine logic)."""
