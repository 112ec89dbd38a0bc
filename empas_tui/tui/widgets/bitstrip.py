"""A genome at a glance: one coloured cell per gene, wrapped to the width, blocks kept together.

Genes hold qtypes ("4", "16" for RTN; "q4_k", "f16" for ggml). Colours follow bits per weight
(``Profile.qtype_bits``): fewer bits, hotter colour; unquantised is neutral grey. So a ggml q4_k
(4.5 bits) and an RTN 4 look alike, and the strip reads the same for both quantisers.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

# (upper bound of bits per weight, style); the first bound at or above a qtype's bits wins.
BITS_STYLES = (
    (2.9, "bold white on #b00020"),
    (3.6, "bold black on #ff6d00"),
    (4.9, "bold black on #ffd600"),
    (5.6, "bold black on #aeea00"),
    (6.9, "bold black on #00c853"),
    (7.6, "bold black on #00bfa5"),
    (9.0, "bold white on #2962ff"),
)
UNQUANTIZED_STYLE = "white on #616161"


def qtype_style(bits_per_weight: float) -> str:
    for bound, style in BITS_STYLES:
        if bits_per_weight <= bound:
            return style
    return UNQUANTIZED_STYLE


def qtype_glyph(qtype: str, width: int = 1) -> str:
    """A label of at most ``width`` cells: "4" / "F" for RTN; "4K", "40", "i4" ... for ggml types."""
    q = str(qtype).lower()
    if q in ("16", "f16", "bf16", "f32"):
        return "F"
    if q.isdigit():
        return q[:width]
    digits = "".join(c for c in q if c.isdigit())
    lead = digits[:1] or q[:1]
    if width == 1:
        return lead
    if q.startswith("iq"):
        return ("i" + lead)[:width]
    tail = q.rsplit("_", 1)[-1][:1] if "_" in q else ""
    return (lead + tail.upper())[:width]


class QtypePalette:
    """Style and bits of each qtype of a profile (``qtypes`` with their ``qtype_bits``)."""

    def __init__(self, qtypes, qtype_bits, unquantized: str = "16") -> None:
        self.bits = {str(q): float(b) for q, b in zip(qtypes, qtype_bits)}
        self.unquantized = str(unquantized)

    @classmethod
    def of(cls, profile) -> "QtypePalette":
        return cls(profile.qtypes, profile.qtype_bits, profile.unquantized)

    def style(self, qtype: str) -> str:
        q = str(qtype)
        if q == self.unquantized:
            return UNQUANTIZED_STYLE
        return qtype_style(self.bits.get(q, 16.0))

    def cell(self, qtype: str) -> Text:
        """A table cell: the qtype's name on its colour."""
        return Text(f" {qtype} ", style=self.style(qtype))

    def legend(self, used=None) -> Text:
        """Each qtype (or those in ``used``), least bits first, on its colour."""
        shown = [q for q in self.bits if used is None or q in set(map(str, used))]
        out = Text("")
        for q in sorted(shown, key=lambda q: (self.bits[q], q)):
            out.append(f" {q} ", style=self.style(q))
            out.append(" ")
        rtn = all(q.isdigit() for q in self.bits)
        out.append("bits (F = 16, untouched)" if rtn else "(F = f16, untouched)", style="dim")
        return out


def strip_text(qtypes: list[str], palette: QtypePalette, blocks: list[int] | None, width: int) -> Text:
    """Cells of ``qtypes`` with a gap between decoder blocks; wide cells when there is room."""
    n = len(qtypes)
    if n == 0:
        return Text("")
    groups: list[list[str]] = []
    if blocks and len(blocks) == n and len(set(blocks)) < n:  # several genes per block: group them
        for i, q in enumerate(qtypes):
            if i == 0 or blocks[i] != blocks[i - 1]:
                groups.append([])
            groups[-1].append(q)
    else:
        groups = [[q] for q in qtypes]
    gap = 0 if all(len(g) == 1 for g in groups) else 1
    cell = 1
    for w in (3, 2):  # the widest cells that still fit on one line
        if sum(len(g) * w for g in groups) + gap * (len(groups) - 1) <= width:
            cell = w
            break
    out = Text("", no_wrap=False, overflow="fold")
    col = 0
    for g in groups:
        glen = len(g) * cell
        if col and col + gap + glen > width:
            out.append("\n")
            col = 0
        elif col and gap:
            out.append(" " * gap)
            col += gap
        for q in g:
            out.append(qtype_glyph(q, min(cell, 2)).center(cell), style=palette.style(q))
        col += glen
    return out


class BitStrip(Static):
    """Shows a genome (one qtype per gene) as coloured cells; ``blocks`` groups the genes of a block."""

    DEFAULT_CSS = "BitStrip { height: auto; width: 1fr; }"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("", *args, **kwargs)
        self.qtypes: list[str] = []
        self.palette: QtypePalette | None = None
        self.blocks: list[int] | None = None

    def show(self, qtypes: list[str], palette: QtypePalette | None = None, blocks: list[int] | None = None) -> None:
        self.qtypes, self.blocks = [str(q) for q in qtypes], blocks
        self.palette = palette or self.palette
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        width = max(self.size.width, 10)
        if self.qtypes and self.palette is not None:
            self.update(strip_text(self.qtypes, self.palette, self.blocks, width))
        else:
            self.update(Text("(no point selected)", style="dim"))
