//! Which copysets a new segment's chunks go to (pure: copyset loads -> choice).

/// Chooses a copyset for each of `n` chunks: always the one with the fewest chunks so far
/// (ties by id), counting the chunks chosen here, so copysets — and with them the
/// chunkservers they are spread over — fill evenly.
pub fn choose_copysets(load: &[(u32, u64)], n: usize) -> Vec<u32> {
    let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u32)>> = load
        .iter()
        .map(|(id, l)| std::cmp::Reverse((*l, *id)))
        .collect();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let Some(std::cmp::Reverse((l, id))) = heap.pop() else {
            break;
        };
        out.push(id);
        heap.push(std::cmp::Reverse((l + 1, id)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_the_emptiest_first_and_evens_out() {
        assert_eq!(choose_copysets(&[(1, 5), (2, 0), (3, 1)], 3), vec![2, 2, 3]);
        let mut load: Vec<(u32, u64)> = (1..=10).map(|i| (i, 0)).collect();
        for _ in 0..7 {
            for id in choose_copysets(&load, 64) {
                load[id as usize - 1].1 += 1;
            }
        }
        let (min, max) = (
            load.iter().map(|l| l.1).min().unwrap(),
            load.iter().map(|l| l.1).max().unwrap(),
        );
        assert!(max - min <= 1, "{load:?}");
        assert!(choose_copysets(&[], 4).is_empty());
    }
}
