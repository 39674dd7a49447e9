"""Reading data as it was downloaded: which files and labels a dataset holds in any layout (layout.py, labels in a
table read by table.py, the folder listing in files.py and the val/test carve in carve.py), image files to pixels
(decode.py), the decoded-image cache (cache.py), near-copies (near_duplicates.py), and generated images for tests
and the demo (synthetic.py)."""
