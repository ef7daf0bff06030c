"""kdstore: run a teacher once, store what it knows, stream it into any student trainer.

Public API::

    import kdstore
    store = kdstore.open_store("path/to/store")      # or "s3://bucket/store", storage_options={...}
    problems = kdstore.verify_store(store)           # [] when every check passes

    from kdstore.build import BuildConfig, build   # loads torch and transformers
    build(BuildConfig(corpus=("docs/",), teacher="my-teacher", out="store"))

    from kdstore.generate import GenerateConfig, generate   # teacher completions (docs/generate.md)
    generate(GenerateConfig(prompts="problems.jsonl", teacher="my-teacher", out="gens", n=4))
    gens = kdstore.open_store("gens", tables=("generations",))
"""

__version__ = "0.1.0"

from kdstore.codec import Codebook, CodecConfig, decode_positions, encode_positions  # noqa: E402
from kdstore.errors import KdstoreError  # noqa: E402
from kdstore.format import Manifest  # noqa: E402
from kdstore.store import Store, open_store  # noqa: E402
from kdstore.verify import verify_store  # noqa: E402
from kdstore.writer import ShardWriter  # noqa: E402

__all__ = [
    "Codebook",
    "CodecConfig",
    "KdstoreError",
    "Manifest",
    "ShardWriter",
    "Store",
    "decode_positions",
    "encode_positions",
    "open_store",
    "verify_store",
]
