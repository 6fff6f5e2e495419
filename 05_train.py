"""Stage 5: the training job (AMP, EMA, checkpoints with exact resume, TensorBoard, DDP).

Not built yet: issue #6 builds this stage. Importing this file does nothing.
"""

if __name__ == "__main__":
    print("05_train.py: not built yet (issue #6).")
