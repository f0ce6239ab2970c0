"""natgrad.es."""
