"""Stage 2: the timm backbone, the input projection and the 2D sine position encoding.

Not built yet: issue #3 builds this stage. Importing this file does nothing.
"""

if __name__ == "__main__":
    print("02_backbone.py: not built yet (issue #3).")
