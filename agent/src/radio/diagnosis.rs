//! Why the concentrator did not start, from what libloragw printed during `lgw_start`.
//!
//! V2.1.0 says why only on stdout, in a fixed order: `lgw_connect` opens the SPI device and
//! reads the chip version (`Opening SPI communication interface`, `Note: chip version is 0x10
//! (v1.0)`), then the radios are calibrated and set up (`sx1250 Image Calibration Error`,
//! `Failed to set SX1250_0 in STANDBY_RC mode`), and last the STTS751 temperature sensor is
//! probed on I2C (`no temperature sensor found on port 0x39`…, `ERROR: no temperature sensor
//! found.`). The first stage that went wrong is the cause; what follows it is consequence.

use super::boards::BoardProfile;

/// The library build the diagnosis is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Semtech's V2.1.0: `lgw_start` needs the STTS751.
    Upstream,
    /// ChirpStack's V2.1.0r9: the sensor is optional.
    ChirpstackR9,
    /// The simulated concentrator: it imitates either, as its file says.
    Simulator,
}

impl Variant {
    pub fn of_build() -> Variant {
        match sx1302_hal_sys::VARIANT {
            "v2.1.0r9" => Variant::ChirpstackR9,
            "simulator" => Variant::Simulator,
            _ => Variant::Upstream,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Variant::Upstream => {
                "Semtech's upstream sx1302_hal V2.1.0: lgw_start needs an STTS751 temperature sensor"
            }
            Variant::ChirpstackR9 => {
                "ChirpStack's sx1302_hal V2.1.0r9: the temperature sensor is optional"
            }
            Variant::Simulator => {
                "imitates Semtech's V2.1.0 or ChirpStack's V2.1.0r9, as its file says"
            }
        }
    }

    /// Whether this build can ever start the board: upstream V2.1.0 cannot start a board without
    /// the STTS751.
    pub fn can_start(self, board: &BoardProfile) -> Result<(), String> {
        if self == Variant::Upstream && board.temperature_sensor.is_none() {
            return Err(format!(
                "the {} has no STTS751 temperature sensor and this build links Semtech's upstream \
                 libloragw V2.1.0, whose lgw_start refuses to start without one: build against \
                 ChirpStack's sx1302_hal V2.1.0r9 (README: building against the real libloragw)",
                board.description
            ));
        }
        Ok(())
    }
}

/// What went wrong first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The SPI device could not be opened.
    NoSpiDevice,
    /// The SPI bus answers nothing: the chip version reads 0x00 or 0xFF.
    SpiSilent,
    /// The SX1302 answers but a radio failed to calibrate or to be set up.
    RadioCalibration,
    /// The I2C device the library probes for the temperature sensor could not be opened.
    NoI2cDevice,
    /// No STTS751 answered on I2C.
    NoTemperatureSensor,
    /// The board could not be reset through its GPIO lines (before the library is called).
    BoardReset,
    /// Something else; the library's last error says what.
    Other,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::NoSpiDevice => "no_spi_device",
            Cause::SpiSilent => "spi_silent",
            Cause::RadioCalibration => "radio_calibration",
            Cause::NoI2cDevice => "no_i2c_device",
            Cause::NoTemperatureSensor => "no_temperature_sensor",
            Cause::BoardReset => "board_reset",
            Cause::Other => "other",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub cause: Cause,
    /// The library's own words: the line that shows the cause.
    pub library_said: Option<String>,
    /// What it means and what to do, for the operator.
    pub advice: String,
}

/// `lines`: what the library printed during the failed `lgw_start`, in order. `spi_path`: the
/// device the board configuration names.
pub fn diagnose(
    lines: &[String],
    variant: Variant,
    board: &BoardProfile,
    spi_path: &str,
) -> Diagnosis {
    let find = |pred: &dyn Fn(&str) -> bool| lines.iter().find(|l| pred(l)).cloned();
    let opened = lines
        .iter()
        .position(|l| l.starts_with("Opening SPI communication interface"));
    let version_line = find(&|l| l.starts_with("Note: chip version is 0x"));
    let version = version_line.as_deref().and_then(|l| {
        let hex = l.strip_prefix("Note: chip version is 0x")?.get(..2)?;
        u8::from_str_radix(hex, 16).ok()
    });

    if opened.is_some() && version_line.is_none() {
        let why = match std::fs::metadata(spi_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
                "{spi_path} does not exist: SPI is not enabled (dtparam=spi=on in the Pi's \
                 config.txt) or radio.spi_path is wrong"
            ),
            Err(e) => format!("{spi_path}: {e}"),
            Ok(_) => format!(
                "{spi_path} exists but could not be opened: the service user needs the spi \
                 group (the package adds it), or another program holds it"
            ),
        };
        return Diagnosis {
            cause: Cause::NoSpiDevice,
            library_said: lines.get(opened.unwrap_or(0)).cloned(),
            advice: format!("the SPI device could not be opened: {why}"),
        };
    }
    if let Some(v @ (0x00 | 0xFF)) = version {
        return Diagnosis {
            cause: Cause::SpiSilent,
            library_said: version_line,
            advice: format!(
                "nothing answers on {spi_path} (every read is 0x{v:02X}): the concentrator is \
                 not seated or not powered, is held in reset (radio.board {:?}: reset on GPIO \
                 {}), or sits on another SPI device",
                board.name, board.sx1302_reset
            ),
        };
    }
    let radio_error = find(&|l| {
        l.starts_with("ERROR")
            && (l.contains("Calibration")
                || l.contains("calibration")
                || l.contains("SX1250")
                || l.contains("setup radio")
                || l.contains("reset radio"))
    });
    if let Some(said) = radio_error {
        return Diagnosis {
            cause: Cause::RadioCalibration,
            library_said: Some(said),
            advice: format!(
                "the SX1302 answers{} but its radio failed to calibrate: a hardware fault of \
                 the concentrator or its supply, or a board profile that does not match it \
                 (radio.board {:?})",
                version
                    .map(|v| format!(" (chip version 0x{v:02X})"))
                    .unwrap_or_default(),
                board.name
            ),
        };
    }
    let sensor_advice = |what: &str| -> String {
        match (variant, board.temperature_sensor) {
            (Variant::ChirpstackR9, _) => format!(
                "{what}; this ChirpStack V2.1.0r9 build was told where the sensor is by the \
                 board profile {:?}: check the board",
                board.name
            ),
            (_, None) => format!(
                "{what}; the {} has no STTS751 temperature sensor, and Semtech's upstream \
                 libloragw V2.1.0 refuses to start without one: build against ChirpStack's \
                 sx1302_hal V2.1.0r9, where the sensor is optional (README: building against \
                 the real libloragw)",
                board.description
            ),
            (_, Some(ts)) => format!(
                "{what}; the {} should have its STTS751 at 0x{:02X} on {}: check that I2C is \
                 enabled (dtparam=i2c_arm=on) and the board is seated",
                board.description, ts.i2c_addr, ts.i2c_path
            ),
        }
    };
    if let Some(said) = find(&|l| l.starts_with("ERROR: failed to open I2C")) {
        return Diagnosis {
            cause: Cause::NoI2cDevice,
            library_said: Some(said),
            advice: sensor_advice(
                "the I2C device of the temperature sensor could not be opened (I2C not enabled, \
                 or the service user lacks the i2c group)",
            ),
        };
    }
    if let Some(said) = find(&|l| l.starts_with("ERROR: no temperature sensor found")) {
        return Diagnosis {
            cause: Cause::NoTemperatureSensor,
            library_said: Some(said),
            advice: sensor_advice("no STTS751 temperature sensor answered on I2C"),
        };
    }
    let last_error = lines.iter().rev().find(|l| l.starts_with("ERROR")).cloned();
    Diagnosis {
        advice: match &last_error {
            Some(_) => "the start failed: the library's last error says why".into(),
            None if lines.is_empty() => "the start failed and the library printed nothing".into(),
            None => "the start failed without an error line from the library".into(),
        },
        cause: Cause::Other,
        library_said: last_error.or_else(|| lines.last().cloned()),
    }
}

#[cfg(test)]
mod tests {
    //! The line sequences are V2.1.0's, read from its source (loragw_com.c lgw_com_open,
    //! loragw_reg.c lgw_connect, loragw_sx1250.c sx1250_calibrate / sx1250_setup,
    //! loragw_sx1302.c sx1302_radio_calibrate, loragw_hal.c lgw_start's sensor probe).
    use super::*;
    use crate::radio::boards::profile;

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    const MISSING: &str = "/nonexistent/spidev9.9";

    #[test]
    fn a_missing_spi_device_is_named_and_never_blamed_on_the_sensor() {
        let d = diagnose(
            &lines(&["Opening SPI communication interface"]),
            Variant::Upstream,
            profile("rak2287").unwrap(),
            MISSING,
        );
        assert_eq!(d.cause, Cause::NoSpiDevice);
        assert!(d.advice.contains("does not exist"), "{}", d.advice);
        assert!(!d.advice.contains("r9"), "{}", d.advice);
    }

    #[test]
    fn a_silent_bus_is_told_apart_from_a_calibration_failure() {
        for (version, then) in [
            (
                "Note: chip version is 0x00 (v0.0)",
                &[
                    "ERROR: Failed to set SX1250_0 in STANDBY_RC mode",
                    "ERROR: failed to setup radio 0",
                ][..],
            ),
            (
                "Note: chip version is 0xFF (v15.15)",
                &[
                    "ERROR: sx1250 Image Calibration Error",
                    "ERROR: radio calibration failed",
                    "ERROR: radio calibration failed",
                ][..],
            ),
        ] {
            let mut l = vec!["Opening SPI communication interface", version];
            l.extend_from_slice(then);
            let d = diagnose(
                &lines(&l),
                Variant::Upstream,
                profile("rak2287").unwrap(),
                MISSING,
            );
            assert_eq!(d.cause, Cause::SpiSilent, "{l:?}");
            assert_eq!(d.library_said.as_deref(), Some(version));
            assert!(!d.advice.contains("r9"));
        }
        let d = diagnose(
            &lines(&[
                "Opening SPI communication interface",
                "Note: chip version is 0x10 (v1.0)",
                "ERROR: sx1250 Image Calibration Error",
                "ERROR: radio calibration failed",
                "ERROR: radio calibration failed",
            ]),
            Variant::Upstream,
            profile("rak2287").unwrap(),
            MISSING,
        );
        assert_eq!(d.cause, Cause::RadioCalibration);
        assert_eq!(
            d.library_said.as_deref(),
            Some("ERROR: sx1250 Image Calibration Error")
        );
        assert!(!d.advice.contains("r9"));
    }

    #[test]
    fn the_r9_advice_only_when_upstream_found_no_sensor_on_a_board_without_one() {
        let absent = lines(&[
            "Opening SPI communication interface",
            "Note: chip version is 0x10 (v1.0)",
            "INFO: using legacy timestamp",
            "INFO: no temperature sensor found on port 0x39",
            "INFO: no temperature sensor found on port 0x3B",
            "INFO: no temperature sensor found on port 0x38",
            "ERROR: no temperature sensor found.",
        ]);
        let rak = profile("rak2287").unwrap();
        let d = diagnose(&absent, Variant::Upstream, rak, MISSING);
        assert_eq!(d.cause, Cause::NoTemperatureSensor);
        assert!(d.advice.contains("V2.1.0r9"), "{}", d.advice);
        // On an r9 build the advice would be absurd.
        let d = diagnose(&absent, Variant::ChirpstackR9, rak, MISSING);
        assert!(!d.advice.contains("build against"), "{}", d.advice);
        // A board that should have the sensor: check the hardware, not the build.
        let d = diagnose(
            &absent,
            Variant::Upstream,
            profile("semtech_corecell").unwrap(),
            MISSING,
        );
        assert!(!d.advice.contains("build against"), "{}", d.advice);
        assert!(d.advice.contains("0x39 on /dev/i2c-1"), "{}", d.advice);

        let no_i2c = lines(&[
            "Opening SPI communication interface",
            "Note: chip version is 0x10 (v1.0)",
            "INFO: using legacy timestamp",
            "ERROR: failed to open I2C for temperature sensor on port 0x39",
        ]);
        let d = diagnose(&no_i2c, Variant::Upstream, rak, MISSING);
        assert_eq!(d.cause, Cause::NoI2cDevice);
        assert_eq!(
            d.library_said.as_deref(),
            Some("ERROR: failed to open I2C for temperature sensor on port 0x39")
        );
    }

    #[test]
    fn anything_else_is_the_librarys_last_error_in_its_own_words() {
        let d = diagnose(
            &lines(&[
                "Opening SPI communication interface",
                "Note: chip version is 0x10 (v1.0)",
                "INFO: using legacy timestamp",
                "ERROR: failed to load ARB firmware",
            ]),
            Variant::Upstream,
            profile("rak2287").unwrap(),
            MISSING,
        );
        assert_eq!(d.cause, Cause::Other);
        assert_eq!(
            d.library_said.as_deref(),
            Some("ERROR: failed to load ARB firmware")
        );
        let d = diagnose(&[], Variant::Upstream, profile("rak2287").unwrap(), MISSING);
        assert_eq!(d.cause, Cause::Other);
        assert!(d.advice.contains("printed nothing"));
    }

    #[test]
    fn only_upstream_refuses_a_board_without_the_sensor() {
        let rak = profile("rak5146").unwrap();
        assert!(Variant::Upstream.can_start(rak).is_err());
        assert!(Variant::ChirpstackR9.can_start(rak).is_ok());
        assert!(Variant::Simulator.can_start(rak).is_ok());
        assert!(Variant::Upstream
            .can_start(profile("semtech_corecell").unwrap())
            .is_ok());
    }
}
