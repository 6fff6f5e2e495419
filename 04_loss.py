"""Stage 4: the asymmetric loss (ASL) and its relatives.

Not built yet: issue #5 builds this stage. Importing this file does nothing.
"""

if __name__ == "__main__":
    print("04_loss.py: not built yet (issue #5).")
