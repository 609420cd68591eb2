//! A Modbus TCP device simulator, served by tokio-modbus's server side over real sockets:
//! the demo's pump station, the tests' devices with known values, and the load benchmark's
//! fleet (`shuyuan simulate --devices N`).
//!
//! Each device has four register tables. The pump-station profile changes its values over
//! time and keeps a poll counter: a u32 at holding 200-201 that goes up by one each time a
//! read covers it, so a gap in the delivered counter means a lost record.

use std::future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_util::sync::CancellationToken;

use crate::collect::points::encode_words;
use crate::config::WordOrder;

/// Holding address of the pump station's poll counter (u32, ABCD).
pub const COUNTER_ADDR: u16 = 200;

#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub holding: Vec<u16>,
    pub input: Vec<u16>,
    pub coils: Vec<bool>,
    pub discrete: Vec<bool>,
    /// A u32 register pair (ABCD) that counts reads covering it.
    pub counter_at: Option<u16>,
}

impl Tables {
    pub fn sized(holding: usize, input: usize, coils: usize, discrete: usize) -> Self {
        Self {
            holding: vec![0; holding],
            input: vec![0; input],
            coils: vec![false; coils],
            discrete: vec![false; discrete],
            counter_at: None,
        }
    }

    /// Writes a big-endian value's bytes at `addr` in the order a device would send them.
    pub fn put_holding(&mut self, addr: u16, be: &[u8], order: WordOrder) {
        for (i, w) in encode_words(be, order).into_iter().enumerate() {
            if let Some(slot) = self.holding.get_mut(usize::from(addr) + i) {
                *slot = w;
            }
        }
    }
}

/// One simulated device (all unit ids answer alike), shared by its connections.
#[derive(Debug, Default)]
pub struct Device {
    tables: Mutex<Tables>,
    served: AtomicU64,
}

impl Device {
    pub fn new(t: Tables) -> Arc<Self> {
        Arc::new(Self {
            tables: Mutex::new(t),
            served: AtomicU64::new(0),
        })
    }

    pub fn update(&self, f: impl FnOnce(&mut Tables)) {
        if let Ok(mut t) = self.tables.lock() {
            f(&mut t);
        }
    }

    /// The poll counter's value (reads served that covered it), 0 without a counter.
    pub fn poll_counter(&self) -> u64 {
        let t = self.snapshot();
        t.counter_at.map_or(0, |c| {
            let i = usize::from(c);
            u64::from(t.holding[i]) << 16 | u64::from(t.holding[i + 1])
        })
    }

    pub fn snapshot(&self) -> Tables {
        self.tables.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Read requests answered (exceptions excluded).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn serve(&self, req: Request<'_>) -> Result<Response, ExceptionCode> {
        let r = self.answer(req);
        if r.is_ok() {
            self.served.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn answer(&self, req: Request<'_>) -> Result<Response, ExceptionCode> {
        let mut t = self
            .tables
            .lock()
            .map_err(|_| ExceptionCode::ServerDeviceFailure)?;
        fn slice<T: Clone>(v: &[T], a: u16, n: u16) -> Result<Vec<T>, ExceptionCode> {
            let (a, n) = (usize::from(a), usize::from(n));
            if n == 0 {
                return Err(ExceptionCode::IllegalDataValue);
            }
            v.get(a..a + n)
                .map(<[T]>::to_vec)
                .ok_or(ExceptionCode::IllegalDataAddress)
        }
        match req {
            Request::ReadHoldingRegisters(a, n) => {
                if n > 125 {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                let out = slice(&t.holding, a, n)?;
                if let Some(c) = t.counter_at {
                    if a <= c && c + 1 < a.saturating_add(n) {
                        bump_counter(&mut t, c);
                    }
                }
                Ok(Response::ReadHoldingRegisters(out))
            }
            Request::ReadInputRegisters(a, n) if n <= 125 => {
                Ok(Response::ReadInputRegisters(slice(&t.input, a, n)?))
            }
            Request::ReadCoils(a, n) if n <= 2000 => {
                Ok(Response::ReadCoils(slice(&t.coils, a, n)?))
            }
            Request::ReadDiscreteInputs(a, n) if n <= 2000 => {
                Ok(Response::ReadDiscreteInputs(slice(&t.discrete, a, n)?))
            }
            Request::ReadInputRegisters(..)
            | Request::ReadCoils(..)
            | Request::ReadDiscreteInputs(..) => Err(ExceptionCode::IllegalDataValue),
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

/// The counter advances after the read that returned it, so reads return 0, 1, 2, ...
fn bump_counter(t: &mut Tables, at: u16) {
    let i = usize::from(at);
    let v = (u32::from(t.holding[i]) << 16 | u32::from(t.holding[i + 1])).wrapping_add(1);
    t.holding[i] = (v >> 16) as u16;
    t.holding[i + 1] = v as u16;
}

struct Service {
    device: Arc<Device>,
}

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        future::ready(self.device.serve(req.request))
    }
}

/// Serves `device` on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, device: Arc<Device>, shutdown: CancellationToken) {
    let server = Server::new(listener);
    let on_connected = move |stream, addr| {
        let device = device.clone();
        async move {
            accept_tcp_connection(stream, addr, move |_| {
                Ok(Some(Service {
                    device: device.clone(),
                }))
            })
        }
    };
    let on_error = |e| tracing::debug!("simulator connection error: {e}");
    let _ = server
        .serve_until(&on_connected, on_error, async move {
            shutdown.cancelled().await
        })
        .await;
}

/// Answers for the units of one RTU bus; silent (as a real bus is) for any other unit.
struct BusService {
    units: Vec<(u8, Arc<Device>)>,
}

impl tokio_modbus::server::Service for BusService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        future::ready(match self.units.iter().find(|(u, _)| *u == req.slave) {
            Some((_, d)) => d.serve(req.request).map(Some),
            None => Ok(None),
        })
    }
}

/// Serves `units` as devices on one Modbus RTU bus at the serial device `port` (a real
/// RS-485 adapter, or one end of a pseudo-terminal pair) until `shutdown` fires.
pub async fn serve_rtu(
    port: &str,
    baud: u32,
    parity: tokio_serial::Parity,
    units: Vec<(u8, Arc<Device>)>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use tokio_serial::SerialPortBuilderExt as _;
    let serial = tokio_serial::new(port, baud)
        .parity(parity)
        .open_native_async()
        .map_err(std::io::Error::other)?;
    let server = tokio_modbus::server::rtu::Server::new(serial);
    server
        .serve_until(
            BusService { units },
            async move { shutdown.cancelled().await },
        )
        .await
        .map(|_| ())
}

/// The demo's pump station: flow (f32 CDAB at holding 100), energy (i32 at holding 102),
/// pressure (u16 ×0.1 kPa at input 0), pump running (coil 5), the poll counter (u32 at
/// holding 200), and a changing serial register that the demo policy does not list.
pub fn pump_station() -> Arc<Device> {
    let mut t = Tables::sized(256, 16, 16, 16);
    t.counter_at = Some(COUNTER_ADDR);
    t.put_holding(100, &118.5f32.to_be_bytes(), WordOrder::CDAB);
    t.put_holding(102, &(-1_250_000i32).to_be_bytes(), WordOrder::ABCD);
    t.input[0] = 3125;
    t.coils[5] = true;
    Device::new(t)
}

/// Moves the pump station's values like a day at a pump: call every second.
pub fn pump_station_step(dev: &Device, second: u64) {
    let phase = (second % 600) as f32 / 600.0 * std::f32::consts::TAU;
    dev.update(|t| {
        t.put_holding(
            100,
            &(118.5 + 20.0 * phase.sin()).to_be_bytes(),
            WordOrder::CDAB,
        );
        t.put_holding(
            102,
            &(-1_250_000i32 + second as i32 * 7).to_be_bytes(),
            WordOrder::ABCD,
        );
        t.input[0] = (3125.0 + 150.0 * phase.cos()) as u16;
        t.coils[5] = (second / 30) % 5 != 4;
    });
}

/// A load-test device: 100 holding registers whose values change every second.
pub fn load_device() -> Arc<Device> {
    Device::new(Tables::sized(100, 0, 0, 0))
}

pub fn load_device_step(dev: &Device, second: u64) {
    dev.update(|t| {
        for (i, r) in t.holding.iter_mut().enumerate() {
            *r = (second as u16).wrapping_mul(31).wrapping_add(i as u16 * 7);
        }
    });
}

/// Binds one listener per device on consecutive ports from `first` (port 0: any free
/// ports) and serves them; returns the bound addresses and a task that ticks their values.
pub async fn serve_fleet(
    first: SocketAddr,
    devices: Vec<Arc<Device>>,
    step: fn(&Device, u64),
    shutdown: CancellationToken,
) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(devices.len());
    for (i, dev) in devices.iter().enumerate() {
        let mut at = first;
        if first.port() != 0 {
            at.set_port(first.port() + i as u16);
        }
        let l = TcpListener::bind(at).await?;
        let a = l.local_addr()?;
        addrs.push(a);
        tokio::spawn(serve(l, dev.clone(), shutdown.clone()));
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut s = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            for d in &devices {
                step(d, s);
            }
            s += 1;
        }
    });
    Ok(addrs)
}
