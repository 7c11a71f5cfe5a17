"""Interactive figures with a static fallback.

``play(draw, t=IntSlider(...))`` shows the controls and a figure drawn with their current
values. Moving a control redraws the same figure in place (through a display id), so:

- in JupyterLab and Colab the figure follows the sliders;
- on GitHub, in nbval and in a notebook opened without a live kernel, the figure drawn with
  the default values is there as an ordinary image.
"""

from __future__ import annotations

from typing import Callable

import matplotlib.pyplot as plt
from IPython.display import display


def play(draw: Callable[..., "plt.Figure"], **controls):
    """Display ``controls`` (ipywidgets) and the figure ``draw(**values)``, redrawn when a control moves.

    ``draw`` takes the controls' values as keyword arguments and returns a matplotlib Figure.
    Returns nothing (so that the cell does not display the controls twice); keep your own
    references to the controls to move them from code.
    """
    import ipywidgets as widgets

    if not controls:
        raise ValueError("play() needs at least one control, e.g. play(draw, t=IntSlider(...))")
    for name, control in controls.items():
        if not hasattr(control, "value") or not hasattr(control, "observe"):
            raise TypeError(f"control {name!r} is not an ipywidgets control (got {type(control).__name__})")

    def render():
        fig = draw(**{name: control.value for name, control in controls.items()})
        if not isinstance(fig, plt.Figure):
            raise TypeError(f"draw() must return a matplotlib Figure, got {type(fig).__name__}")
        return fig

    box = widgets.VBox(list(controls.values()))
    display(box)
    fig = render()
    handle = display(fig, display_id=True)
    plt.close(fig)

    def redraw(_change=None):
        new = render()
        handle.update(new)
        plt.close(new)

    for control in controls.values():
        control.observe(redraw, names="value")
