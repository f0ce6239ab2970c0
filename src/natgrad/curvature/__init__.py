"""natgrad.curvature."""
