"""`slimcart serve`: load a model (and a catalogue index), warm it up, serve it until SIGTERM/SIGINT."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import SlimcartError
from . import llm, recsys, search  # noqa: F401 - the built-in adapters register themselves
from .app import ServeOptions, build_app, make_server
from .loading import load_model
from .servable import SERVABLES


def prepare(workload: str, model: str, index: str | Path | None = None, opts: ServeOptions | None = None,
            threads: int = 1, say: Callable[[str], None] = lambda m: None):
    """(app, options) ready to run: everything a user can get wrong is checked before the model loads."""
    opts = opts or ServeOptions()
    idx = None
    if index is not None:
        if workload != "search":
            raise SlimcartError("--index is for the search workload (it answers /search)")
        from .index import CatalogueIndex

        idx = CatalogueIndex.load(Path(index))
        say(f"index: {idx.size} items, {idx.meta['kind']}")
    if threads < 1:
        raise SlimcartError(f"--threads must be at least 1, got {threads}")
    say("loading the model")
    wl, runner, bundle = load_model(workload, model, threads)
    servable = servable_for(workload, runner, bundle, opts.limits(), wl=wl, index=idx)
    say("warming up")
    warm = servable.warmup(opts.max_batch)
    app = build_app(servable, opts, warm=warm, say=say)
    freeze_heap()
    return app, opts


def freeze_heap() -> None:
    """Move every object alive now (the model, torch, transformers: hundreds of thousands of them) out of
    the garbage collector's view. A full collection walks every tracked object, so with them a pause of
    tens to hundreds of ms can land on whichever request is running; requests allocate only short-lived
    objects, which the young generations still collect."""
    import gc

    gc.collect()
    gc.freeze()


def serve(workload: str, model: str, index: str | Path | None = None, opts: ServeOptions | None = None,
          threads: int = 1, say: Callable[[str], None] = lambda m: None) -> None:
    app, opts = prepare(workload, model, index, opts, threads, say)
    server = make_server(app, opts)
    say(f"serving {workload} model {model} on http://{opts.host}:{opts.port} "
        f"(POST {', '.join(r.path for r in app.routes if getattr(r, 'methods', None) == {'POST'})})")
    server.run()


def servable_for(workload: str, runner, bundle, limits, **options):
    """The servable of a workload: its registered adapter around the loaded model."""
    factory = SERVABLES.get(workload)
    if factory is None:
        raise SlimcartError(f"workload '{workload}' cannot be served yet (servable workloads: {', '.join(sorted(SERVABLES))})")
    return factory(runner, bundle, limits, **options)
