"""The pipeline: the ordered science stages of one frame (:mod:`.stages`) and the runner that takes a file
through them and records its outcome (:mod:`.runner`).
"""
