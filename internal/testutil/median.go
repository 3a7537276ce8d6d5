package testutil

import (
	"slices"
	"time"
)

// Median is the middle value of xs (the mean of the two middle ones for an
// even count), 0 for none; xs is left as it was. Benchmarks report medians
// because a loaded 2-core machine gives long tails.
func Median[T ~int64 | ~float64](xs []T) T {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// MinMax is the smallest and the largest of ds, 0 and 0 for none.
func MinMax(ds []time.Duration) (lo, hi time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	return slices.Min(ds), slices.Max(ds)
}
