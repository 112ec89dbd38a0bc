"""One front point: its genome as a strip and its type per gene, full screen (for small terminals)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label

from ..format import layer_rows, point_summary
from ..widgets.bitstrip import BitStrip, QtypePalette


class PointScreen(Screen):
    TITLE_TEXT = "Point layers"
    HELP = "The type of every gene of the selected point, with its predicted contribution to the loss."
    BINDINGS = [Binding("escape,enter,q", "app.pop_screen", "Back")]

    def __init__(self, study: str, point, profile) -> None:
        super().__init__()
        self.study, self.point, self.profile = study, point, profile
        self.palette = QtypePalette.of(profile)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label(point_summary(self.point, self.profile), id="point-title")
        yield BitStrip(id="point-strip")
        yield Label(self.palette.legend(self.point.qtypes), id="point-legend")
        yield DataTable(id="point-layers", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.study} trial {self.point.trial_number}"
        blocks = self.profile.gene_blocks if self.profile.granularity != "block" else None
        self.query_one("#point-strip", BitStrip).show(self.point.qtypes, self.palette, blocks)
        table = self.query_one("#point-layers", DataTable)
        table.add_columns("#", "layer", "block", "type", "params", "pred. KL (nats)")
        for i, name, block, q, params, kl in layer_rows(self.profile, self.point.qtypes):
            table.add_row(str(i), name, str(block), self.palette.cell(q), f"{params:,}", f"{kl:.5f}")
        table.focus()
