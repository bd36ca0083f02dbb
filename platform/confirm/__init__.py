"""The confirm stage of a sweep: its top-k configurations re-trained at the full budget with new
seeds, reported as mean ± std over seeds, the winner picked by the mean (`confirm:` in the search
file, or `cmx sweep confirm NAME` on a finished sweep)."""
