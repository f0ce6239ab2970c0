"""natgrad.models."""
