"""What a person looks at: the loss-landscape geometry of a run and its report (Markdown and HTML).

``compute_landscape(run_dir)`` (``swalab landscape``) evaluates and saves the geometry;
``build_report(run_dir)`` (``swalab report``) assembles tables and figures from saved files only.
"""

from .build import build_report
from .geometry import PIECES, LandscapeOptions, compute_landscape

__all__ = ["PIECES", "LandscapeOptions", "build_report", "compute_landscape"]
