"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 2."""


class SlimcartError(Exception):
    """A problem with the user's input (model, data, recipe, output path) — never a bug in slimcart."""
