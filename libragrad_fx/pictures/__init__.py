"""Pictures of explanations: maps over the image, laid out in a grid, saved as PNG, JPEG, PDF
or SVG.

The last step of the one-way flow model → graph → attributions → metrics → pictures; nothing
here knows a model or a method, only images, maps and their titles.
"""

from .grid import SCALES, Panel, check_writable, figure_size, save_grid
from .overlay import overlay

__all__ = ["SCALES", "Panel", "check_writable", "figure_size", "overlay", "save_grid"]
