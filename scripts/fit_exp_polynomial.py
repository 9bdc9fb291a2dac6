"""Fits the polynomial of csrc/common/vec_math.h's float32 sigmoid: exp(r) on
[-ln2/2, ln2/2], degree 6, for minimal maximum *relative* error (iteratively reweighted
least squares, which converges to the equioscillating minimax fit), and prints its
coefficients (highest degree first) and their error before and after float32 rounding.

    python scripts/fit_exp_polynomial.py [degree]
"""
import sys

import numpy as np


def fit(degree, points=20001, iterations=100):
    half_ln2 = np.log(2) / 2
    r = np.linspace(-half_ln2, half_ln2, points)
    weights = np.exp(-r)  # relative error: residuals scaled by 1 / exp(r)
    best, best_error = None, np.inf
    for _ in range(iterations):
        coefficients = np.polyfit(r, np.exp(r), degree, w=weights)
        error = np.abs(np.polyval(coefficients, r) * np.exp(-r) - 1)
        if error.max() < best_error:
            best, best_error = coefficients, error.max()
        weights = weights * (1 + error / error.max()) ** 4  # lean on the worst points
    return r, best


def main():
    degree = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    r, coefficients = fit(degree)
    single = coefficients.astype(np.float32)
    horner = np.float32(single[0])
    for c in single[1:]:
        horner = (horner * r.astype(np.float32) + c).astype(np.float32)
    print("coefficients:", ", ".join(f"{np.format_float_scientific(c, unique=True)}f" for c in single))
    print("max relative error, float64 evaluation:",
          np.abs(np.polyval(coefficients, r) * np.exp(-r) - 1).max())
    print("max relative error, float32 Horner:", np.abs(horner * np.exp(-r) - 1).max())


if __name__ == "__main__":
    main()
