"""Human-readable reports of measured results."""
