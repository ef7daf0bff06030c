"""info and verify on a store in a bucket against the same store on local disk, in one run.

    python benchmarks/remote.py STORE [--rounds 3]

Starts an S3-compatible server (moto's, on loopback: needs the test extras), copies STORE into it with
`kdstore copy`, then times `info` (open the store, summarise) and `verify` (every check, every byte) on
the local folder and on the s3:// URL, best of --rounds each, and prints the ratios. Loopback has no
network latency to speak of, so the ratio is the cost of going through s3fs and HTTP, not of a real
network. Nothing leaves the machine (dummy credentials, a local endpoint).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from kdstore.store import open_store
from kdstore.transfer import copy_store
from kdstore.verify import verify_store


def best(rounds: int, action) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import s3fs
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    with tempfile.TemporaryDirectory() as aws:
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": f"{aws}/none",
                           "AWS_SHARED_CREDENTIALS_FILE": f"{aws}/none"})
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            options = {"endpoint_url": f"http://{host}:{port}"}
            s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("bench")
            url = "s3://bench/store"
            copy_store(args.store, url, target_options=options)
            manifest = open_store(args.store).manifest
            print(f"{args.store}: {len(manifest.shards)} shards, {manifest.total_bytes:,} bytes; best of {args.rounds}")
            for name, action in (("info", lambda location, opts: open_store(location, opts).summary()),
                                 ("verify", lambda location, opts: verify_store(open_store(location, opts)))):
                local = best(args.rounds, lambda act=action: act(args.store, None))
                remote = best(args.rounds, lambda act=action: act(url, options))
                print(f"  {name:<7} local {local * 1e3:9.1f} ms   s3 (loopback) {remote * 1e3:9.1f} ms   "
                      f"s3 / local = {remote / local:.2f}x")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
