"""natgrad.rl."""
