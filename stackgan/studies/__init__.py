"""Research commands that measure the measuring instruments (no registered metric uses them).

* ``python -m stackgan.studies.judge_ceiling``: a judge's scores on birds redrawn by the
  embedded renderer, next to real images: the ceiling for a caption-following generator.
* ``python -m stackgan.studies.text_probe``: how much of what captions state their text
  embeddings carry: an image-free upper bound for judge consistency.
"""
