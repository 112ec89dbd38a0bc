"""A genome at a glance: one coloured cell per layer, wrapped to the width, blocks kept together."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

# Fewer bits = hotter colour; 16 (untouched) is neutral.
BIT_STYLES = {
    2: "bold white on #b00020",
    3: "bold black on #ff6d00",
    4: "bold black on #ffd600",
    5: "bold black on #aeea00",
    6: "bold black on #00c853",
    7: "bold black on #00bfa5",
    8: "bold white on #2962ff",
    16: "white on #616161",
}


def bit_style(bits: int) -> str:
    return BIT_STYLES.get(int(bits), "reverse")


def bit_char(bits: int) -> str:
    return "F" if int(bits) == 16 else str(int(bits))


def legend(bits: list[int]) -> Text:
    out = Text("")
    for b in bits:
        out.append(f" {b} ", style=bit_style(b))
        out.append(" ")
    out.append("bits (F = 16, untouched)", style="dim")
    return out


def strip_text(bits: list[int], blocks: list[int] | None, width: int) -> Text:
    """Cells of ``bits`` with a gap between decoder blocks; wide cells when there is room."""
    n = len(bits)
    if n == 0:
        return Text("")
    groups: list[list[int]] = []
    if blocks and len(blocks) == n and len(set(blocks)) < n:  # several genes per block: group them
        for i, b in enumerate(bits):
            if i == 0 or blocks[i] != blocks[i - 1]:
                groups.append([])
            groups[-1].append(b)
    else:
        groups = [[b] for b in bits]
    one_per_group = all(len(g) == 1 for g in groups)
    gap = 0 if one_per_group else 1
    cell = 1
    for w in (3, 2):  # the widest cells that still fit on one line
        if sum(len(g) * w for g in groups) + gap * (len(groups) - 1) <= width:
            cell = w
            break
    out = Text("", no_wrap=False, overflow="fold")
    col = 0
    for gi, g in enumerate(groups):
        glen = len(g) * cell
        if col and col + gap + glen > width:
            out.append("\n")
            col = 0
        elif col and gap:
            out.append(" " * gap)
            col += gap
        for b in g:
            out.append(bit_char(b).center(cell), style=bit_style(b))
        col += glen
    return out


class BitStrip(Static):
    """Shows ``bits`` (one per gene) as coloured cells; ``blocks`` groups the genes of one block."""

    DEFAULT_CSS = "BitStrip { height: auto; width: 1fr; }"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("", *args, **kwargs)
        self.bits: list[int] = []
        self.blocks: list[int] | None = None

    def show(self, bits: list[int], blocks: list[int] | None = None) -> None:
        self.bits, self.blocks = [int(b) for b in bits], blocks
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        width = max(self.size.width, 10)
        self.update(strip_text(self.bits, self.blocks, width) if self.bits else Text("(no point selected)",
                                                                                      style="dim"))
