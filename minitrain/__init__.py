"""minitrain's stage-2 library; the entry points (train.py, process_data.py, sampler.py) stay at the top level.

One loop (train.py), two seams: objectives.py (what a unit of data is and what its loss is) and model.py (the model
adapter: what trains and what an export holds). The rest serves both: data.py (the token cache and packs), loss.py
(cross-entropy through the LM head), checkpoint.py (the output folder's contract), validation.py, run_log.py,
distributed.py and atomic.py.
"""

IGNORE = -100  # the label of a token the model is not trained to produce (as in Hugging Face)
