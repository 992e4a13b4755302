//! A test device: another device whose every `every`-th request completes `delay` late, so
//! that requests complete out of order (frontends must not assume FIFO completion; restart
//! tests need requests in flight while later ones are done).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::{BlockDevice, DeviceInfo, Extent, IoFuture, WriteFlags, ZeroFlags};

/// Delays some requests of `inner`.
#[derive(Debug)]
pub struct DelayDevice {
    inner: Arc<dyn BlockDevice>,
    every: u64,
    delay: Duration,
    count: AtomicU64,
}

impl DelayDevice {
    /// Every `every`-th request of `inner` (0: none) completes `delay` late.
    pub fn new(inner: Arc<dyn BlockDevice>, every: u64, delay: Duration) -> Self {
        DelayDevice {
            inner,
            every,
            delay,
            count: AtomicU64::new(0),
        }
    }

    fn late(&self) -> Option<Duration> {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        (self.every > 0 && n.is_multiple_of(self.every)).then_some(self.delay)
    }
}

/// Resolves after `d`, from any executor (a helper thread wakes it).
async fn sleep(d: Duration) {
    let state: Arc<Mutex<(bool, Option<Waker>)>> = Arc::default();
    let s2 = state.clone();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let mut g = s2.lock().expect("not poisoned");
        g.0 = true;
        if let Some(w) = g.1.take() {
            w.wake();
        }
    });
    std::future::poll_fn(|cx| {
        let mut g = state.lock().expect("not poisoned");
        if g.0 {
            Poll::Ready(())
        } else {
            g.1 = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

impl BlockDevice for DelayDevice {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a> {
        let late = self.late();
        Box::pin(async move {
            let r = self.inner.read(offset, buf).await;
            if let Some(d) = late {
                sleep(d).await;
            }
            r
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        let late = self.late();
        Box::pin(async move {
            let r = self.inner.write(offset, buf, flags).await;
            if let Some(d) = late {
                sleep(d).await;
            }
            r
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        self.inner.write_zeroes(offset, len, flags)
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[test]
    fn some_requests_finish_late_and_out_of_order() {
        let d = DelayDevice::new(
            Arc::new(MemDevice::new(1 << 20).unwrap()),
            2,
            Duration::from_millis(30),
        );
        let mut a = vec![0u8; 4096];
        let t = std::time::Instant::now();
        futures_lite_block_on(d.write(0, &[1u8; 4096], WriteFlags::default())).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(25),
            "the first is on time"
        );
        futures_lite_block_on(d.read(0, &mut a)).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "the second is late"
        );
        assert_eq!(a, vec![1u8; 4096]);
    }

    /// A minimal executor for the test: parks the thread until woken.
    fn futures_lite_block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        struct W(std::thread::Thread);
        impl std::task::Wake for W {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(W(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }
}
