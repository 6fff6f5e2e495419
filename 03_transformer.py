"""Stage 3: hand-written multi-head attention, the encoder/decoder and the Query2Label model.

Not built yet: issue #4 builds this stage. Importing this file does nothing.
"""

if __name__ == "__main__":
    print("03_transformer.py: not built yet (issue #4).")
