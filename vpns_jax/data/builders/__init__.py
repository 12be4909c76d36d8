"""The project's own TFDS builders (datasets that TFDS cannot fetch, and offline data).

Each module defines one ``tfds.core.GeneratorBasedBuilder`` (not registered in TFDS's catalogue,
names prefixed ``vpns_``) that reads files from a manual directory, yields encoded image bytes and
is written as ``array_record``, so it is read back without TensorFlow through
``builder.as_data_source``.
"""
