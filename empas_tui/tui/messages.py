"""Every message of the TUI, in one place.

Worker threads never touch widgets: they post one of these to their screen (``post_message`` is
thread-safe) and the screen records it and redraws on its timer. A screen handles a message in the
method Textual derives from the class name (``ProfilePlanned`` -> ``on_profile_planned``).
"""

from __future__ import annotations

from textual.message import Message


class LogLine(Message):
    """A formatted log record, posted to the app from any thread."""

    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line


# -- studies and setup -----------------------------------------------------------------------------

class StudiesListed(Message):
    """The studies (``search.catalogue.list_studies``) and cached profiles of the storage."""

    def __init__(self, studies: list[dict], profiles: list[dict], error: str = "") -> None:
        super().__init__()
        self.studies, self.profiles, self.error = studies, profiles, error


class StudyDeleted(Message):
    def __init__(self, name: str, error: str = "") -> None:
        super().__init__()
        self.name, self.error = name, error


class StudyNames(Message):
    """The study names already taken (the setup screen suggests a free one)."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names


# -- profile ----------------------------------------------------------------------------------------

class ProfileStatus(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ProfilePlanned(Message):
    """The genes, the qtypes each can take and the cells already stored (``jobs.profile_plan``)."""

    def __init__(self, plan) -> None:
        super().__init__()
        self.plan = plan


class ProfileProgress(Message):
    """One ``profiling.sensitivity.ProfileEvent``."""

    def __init__(self, event) -> None:
        super().__init__()
        self.event = event


class ProfileFinished(Message):
    """The finished ``jobs.profile.ProfileJob``."""

    def __init__(self, job) -> None:
        super().__init__()
        self.job = job


class ProfileStopped(Message):
    def __init__(self, text: str, error: bool) -> None:
        super().__init__()
        self.text, self.error = text, error


# -- search -----------------------------------------------------------------------------------------

class FrontLoaded(Message):
    """A stored study's front (``search.catalogue.load_front``), or why it could not be read."""

    def __init__(self, front=None, error: str = "") -> None:
        super().__init__()
        self.front, self.error = front, error


class ExactFrontReady(Message):
    """The exact front of the proxy as (MiB, loss) rows."""

    def __init__(self, xy, count: int) -> None:
        super().__init__()
        self.xy, self.count = xy, count


class SearchProgress(Message):
    """A ``search.results.SearchEvent``, or (event None) a status line while the job prepares."""

    def __init__(self, event=None, status: str = "") -> None:
        super().__init__()
        self.event, self.status = event, status


class SearchEnded(Message):
    """The ``jobs.search.SearchJob`` of a finished or paused run, or the one-line error."""

    def __init__(self, job=None, error: str = "") -> None:
        super().__init__()
        self.job, self.error = job, error


# -- archetypes -------------------------------------------------------------------------------------

class ArchetypesChosen(Message):
    """A ``jobs.export.ExportResult`` computed without writing (choices, skipped, front) for the
    ``settings`` (an ``ExportSettings``) it was chosen under; ``budget``: a budget the user asked for."""

    def __init__(self, settings, result=None, error: str = "", budget: bool = False, presets=None,
                 presets_error: str = "") -> None:
        super().__init__()
        self.settings, self.result, self.error, self.budget = settings, result, error, budget
        self.presets, self.presets_error = presets, presets_error  # ggml: jobs.baselines.PresetBaseline list


class ValidationProgress(Message):
    """A ``profiling.evaluation.ValidationEvent`` of one phase ("archetypes" or "baselines"), or a
    status line (event None)."""

    def __init__(self, event=None, phase: str = "", status: str = "") -> None:
        super().__init__()
        self.event, self.phase, self.status = event, phase, status


class ValidationDone(Message):
    """Held-out measurements: the export result with its validation, and the baselines' result."""

    def __init__(self, result=None, baselines=None, error: str = "", cancelled: bool = False) -> None:
        super().__init__()
        self.result, self.baselines, self.error, self.cancelled = result, baselines, error, cancelled


class ExportWritten(Message):
    """What ``jobs.export.export_job`` wrote (all of it, or nothing and the error)."""

    def __init__(self, result=None, error: str = "") -> None:
        super().__init__()
        self.result, self.error = result, error


class LlamaCppProgress(Message):
    """Progress of ``jobs.run.measure_in_llamacpp``: ``done`` of ``total`` steps, the one under way."""

    def __init__(self, done: int, total: int, name: str) -> None:
        super().__init__()
        self.done, self.total, self.name = done, total, name


class LlamaCppDone(Message):
    """The ``jobs.run.LlamaCppRun`` of the exported files and the presets, or why there is none."""

    def __init__(self, run=None, error: str = "", cancelled: bool = False) -> None:
        super().__init__()
        self.run, self.error, self.cancelled = run, error, cancelled


class PresetsReady(Message):
    """llama.cpp's presets as points of a ggml study (``jobs.baselines.PresetBaseline`` list)."""

    def __init__(self, presets) -> None:
        super().__init__()
        self.presets = presets


# -- dashboard and widgets --------------------------------------------------------------------------

class DashboardStarted(Message):
    def __init__(self, handle=None, error: str = "") -> None:
        super().__init__()
        self.handle, self.error = handle, error


class PointClicked(Message):
    """The Pareto plot was clicked near front point ``index``."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
