"""The Dask engine: the Master's side (engine.py, session.py, link.py) and
what runs inside Dask workers (boot.py, worker.py). Importing this package
imports nothing of Dask: each module imports it when it is used."""
