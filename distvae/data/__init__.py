"""The data path, in the order data flows through it.

    synth.py    the built-in synthetic face set (CelebA's layout, for tests and `make train`)
    pack.py     a folder or CelebA root -> webdataset .tar shards + manifest.json
    shards.py   shard specs -> Shard list; a lean tar reader (sequential and random access)
    decode.py   one sample -> uint8 image: crop (decided by the shards) and resize
    plan.py     the global plan: which sample sits at each position of an epoch, for any topology
    batches.py  a data worker's batches: reading, decoding, replacing bad samples
    stream.py   ShardStream: batches for one rank, resumable, with the DataLoader's workers
"""
