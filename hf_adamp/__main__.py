"""``python -m hf_adamp [options] SCRIPT.py [script args]``: see ``hf_adamp.launch``."""

from hf_adamp.launch import main

if __name__ == "__main__":
    main()
