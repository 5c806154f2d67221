"""The Hydra training app (also installed as ``lightning-hybrid-train``); see lightning_hybrid/app/train.py.

python examples/train.py strategy=hybrid threshold=cosine trainer.devices=4
python examples/train.py -m strategy=sync,async,hybrid seed=1,2
"""

from lightning_hybrid.app import main

if __name__ == "__main__":
    main()
