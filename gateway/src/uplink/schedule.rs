//! When the uplink may push: `every` (a period) and/or `windows` of local time such as
//! `"01:00-05:00"` (a window may cross midnight: `"22:00-02:00"`). Outside every window
//! batches wait in the outbox; `shuyuan push` overrides the schedule once.

use std::time::Duration;

/// A daily window in local time, `[start, end)` in minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
}

impl Window {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("window {text:?} must be \"HH:MM-HH:MM\" in local time, e.g. \"01:00-05:00\"")
        };
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let minutes = |t: &str| -> Result<u32, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let (start, end) = (minutes(a)?, minutes(b)?);
        if start == end {
            return Err(format!("window {text:?} is empty: start and end are equal"));
        }
        Ok(Self { start, end })
    }

    fn contains(&self, minute: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Schedule {
    pub windows: Vec<Window>,
}

impl Schedule {
    /// `None` when pushing is allowed at this local time (seconds after midnight); else how
    /// long until the next window opens.
    pub fn closed_for(&self, second_of_day: u32) -> Option<Duration> {
        if self.windows.is_empty() {
            return None;
        }
        let minute = second_of_day / 60;
        if self.windows.iter().any(|w| w.contains(minute)) {
            return None;
        }
        let wait = self
            .windows
            .iter()
            .map(|w| (w.start * 60 + 86_400 - second_of_day) % 86_400)
            .min()
            .unwrap_or(60);
        Some(Duration::from_secs(u64::from(wait.max(1))))
    }

    /// The same, for now in the system's local time zone.
    pub fn closed_now(&self) -> Option<Duration> {
        use chrono::Timelike;
        let now = chrono::Local::now();
        self.closed_for(now.num_seconds_from_midnight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u32, m: u32) -> u32 {
        (h * 60 + m) * 60
    }

    #[test]
    fn windows_open_and_close_including_across_midnight() {
        let s = Schedule {
            windows: vec![
                Window::parse("01:00-05:00").unwrap(),
                Window::parse("22:30-23:00").unwrap(),
            ],
        };
        assert_eq!(s.closed_for(at(2, 0)), None);
        assert_eq!(
            s.closed_for(at(5, 0)),
            Some(Duration::from_secs(((22 * 60 + 30) - 5 * 60) * 60))
        );
        assert_eq!(s.closed_for(at(23, 30)), Some(Duration::from_secs(90 * 60)));
        let night = Schedule {
            windows: vec![Window::parse("22:00-02:00").unwrap()],
        };
        assert_eq!(night.closed_for(at(23, 59)), None);
        assert_eq!(night.closed_for(at(1, 59)), None);
        assert_eq!(
            night.closed_for(at(2, 0)),
            Some(Duration::from_secs(20 * 3600))
        );
        assert_eq!(Schedule::default().closed_for(at(12, 0)), None);
    }

    #[test]
    fn bad_windows_are_refused() {
        for bad in [
            "1-5",
            "01:00",
            "25:00-01:00",
            "01:00-01:00",
            "aa:bb-cc:dd",
            "01:60-02:00",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
        assert!(Window::parse("00:00-24:00").is_ok());
    }
}
