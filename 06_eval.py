"""Stage 6: metrics (mAP, CF1/OF1), evaluation of checkpoints, prediction and attention maps.

Not built yet: issue #7 builds this stage. Importing this file does nothing.
"""

if __name__ == "__main__":
    print("06_eval.py: not built yet (issue #7).")
