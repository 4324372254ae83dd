"""Compression techniques. Each family is one verb with a typed config; recipes call them via steps."""
