"""Cross-backend numerical checks: per-layer capture, error metrics with per-dtype tolerances, reports."""
