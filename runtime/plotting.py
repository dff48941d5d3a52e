"""matplotlib, the optional `plots` extra (`pip install 'codellama-rt[plots]'`): a Figure to draw on, or an
error saying how to install it. Figures are drawn with the object API (no pyplot), so the caller's
matplotlib backend and figure list are left alone."""
from __future__ import annotations

from .errors import MissingExtraError

INSTALL_HINT = "pip install 'codellama-rt[plots]'"


def require(feature: str) -> None:
    """Raise MissingExtraError naming `feature` (and how to install the extra) when matplotlib is missing."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"{feature} needs matplotlib, which is not installed: {INSTALL_HINT}") from e


def new_figure(feature: str, **kwargs):
    """A `matplotlib.figure.Figure(**kwargs)`; MissingExtraError naming `feature` without matplotlib."""
    require(feature)
    from matplotlib.figure import Figure

    return Figure(**kwargs)
