"""Evaluation: COCO-style box AP (coco.py) and the shapes demo's figures (shapes.py)."""
