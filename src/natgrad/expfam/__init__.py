"""natgrad.expfam."""
