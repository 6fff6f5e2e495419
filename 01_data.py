"""Stage 1: data. COCO 2014, any COCO-format dataset and the built-in synthetic dataset; transforms, CutMix, DataLoaders.

Not built yet: issue #2 builds this stage. Importing this file does nothing.
"""

if __name__ == "__main__":
    print("01_data.py: not built yet (issue #2).")
