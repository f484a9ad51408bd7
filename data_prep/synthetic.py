"""Write chest-CT phantoms in the LUNA16 layout: `python data_prep/synthetic.py --out DIR --count N`."""

from dira3d.data.synthetic import main

if __name__ == "__main__":
    raise SystemExit(main())
