"""Stage bodies: one module per DVC stage. Each reads its params, calls the library, writes its out folder.

`stages.specs` declares the DAG (and generates dvc.yaml); `stages.runner` executes one stage in a Ray worker.
"""
