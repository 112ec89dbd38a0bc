"""The job layer: the pipeline both clients run, one function per step.

    ensure_profile -> run_search_job -> select (export_job) -> export -> apply / run

The CLI (:mod:`empas_tui.cli`) and the TUI (:mod:`empas_tui.tui`) only turn user input into the
settings objects of the engine (:class:`profiling.settings.ProfileSettings`,
:class:`search.settings.SearchSettings`, :class:`search.export_settings.ExportSettings`), call these
functions, and show what they report. Long jobs take ``progress`` callbacks and a ``should_stop``
flag, so the TUI runs them in worker threads and the CLI draws progress bars. Nothing here prints.
"""
