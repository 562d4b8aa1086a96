"""Evaluation: COCO-style box AP (coco.py), LVIS fixed AP (lvis.py), Flickr30k entities
recall (flickr.py), ODinW (odinw.py), running a model over a set on several devices
and hosts (datasets.py, hosts.py) and the shapes demo's figures (shapes.py)."""
