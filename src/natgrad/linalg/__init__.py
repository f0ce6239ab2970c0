"""natgrad.linalg."""
