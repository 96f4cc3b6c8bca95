"""The main job, as a command line over ``imgtasks.thumbnails``.

    python flows/run.py                          # 1000 images from the embedded demo server
    python flows/run.py --scheduler processes    # single-threaded worker processes
    python flows/run.py --urls urls.parquet --out s3://bucket/thumbs --scheduler tls://host:8786 \
        --tls-ca-file ca.pem --tls-cert client.pem --tls-key client-key.pem

The command line itself is ``flows/runjob.py``; this file is only its entry point, and
imports nothing at the top. Dask's local worker processes start by running the main
module again (multiprocessing's spawn method, as ``__mp_main__``), so whatever this file
imported, every worker imported too: 0.8 s of CPU each (bokeh for the job page, the
cluster layer), three processes on two cores, before the first request went out.
"""

if __name__ == "__main__":
    import gc
    import sys

    # No garbage collection while the modules import: their objects live as long as the
    # process, so the collections their allocations trigger free nothing (0.13-0.24 s of
    # the ~1.1 s of CPU these imports take).
    gc.disable()
    from imgtasks import memtrim, workerstart

    memtrim.for_command_line()  # before anything imports pyarrow or starts a thread
    # Before the command line's own imports: the workers' fork server imports what they
    # need meanwhile, on the other core (imgtasks/workerstart.py).
    workerstart.start_for_command_line(sys.argv[1:])
    from runjob import entry

    import imgtasks.api  # noqa: F401  (the library's run: imported now, frozen below)

    # Out of every later collection: in a 3000-image run one full collection over them
    # took 0.39 s, the GIL held (the scheduler's loop waits) (benchmarks/README.md).
    gc.freeze()
    gc.enable()
    entry()  # leaves the process with the run's exit code
