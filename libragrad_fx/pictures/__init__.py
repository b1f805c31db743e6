"""Pictures of explanations: maps over the image, laid out in a grid, saved as PNG, JPEG, PDF
or SVG; and maps over a token sequence as coloured text (terminal, HTML, picture).

The last step of the one-way flow model → graph → attributions → metrics → pictures; nothing
here knows a model or a method, only images, maps and their titles.
"""

from .grid import SCALES, Panel, check_writable, figure_size, save_grid
from .overlay import overlay
from .text import ansi, save_text, to_html, token_colours

__all__ = ["SCALES", "Panel", "ansi", "check_writable", "figure_size", "overlay", "save_grid",
           "save_text", "to_html", "token_colours"]
