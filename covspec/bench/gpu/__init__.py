"""``covspec bench gpu``: the Triton verifier against torch (``kernel``) and the edge
serving on the GPU end to end (``serve``)."""
