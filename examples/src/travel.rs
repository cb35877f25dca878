//! The travel saga: book a flight (cancel), a hotel (cancel), a car (cancel), then confirm.

use saga_core::{SagaDefinition, StepContext};
use serde::{Deserialize, Serialize};

use crate::order::{retry, step_timeout};
use crate::{CommandSpec, Example, Receipt};

/// A trip to book.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    /// The trip number.
    pub trip_no: u64,
    /// Where to.
    pub destination: String,
    /// How many nights.
    pub nights: u32,
    /// No car is left at the destination: the saga compensates.
    #[serde(default)]
    pub no_cars: bool,
}

/// What each travel command receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Booking {
    /// The trip number.
    pub trip_no: u64,
    /// Where to.
    pub destination: String,
    /// The receipt of the booking this command cancels, if any.
    pub receipt: Option<Receipt>,
    /// Whether no car is left.
    pub no_cars: bool,
}

/// The travel saga.
#[derive(Debug, Clone, Copy)]
pub struct TravelSaga;

fn booking(
    step: Option<&'static str>,
) -> impl Fn(&StepContext<'_, Trip>) -> Result<Booking, saga_core::InputError> + Send + Sync + 'static
{
    move |ctx| {
        let t = ctx.input();
        Ok(Booking {
            trip_no: t.trip_no,
            destination: t.destination.clone(),
            receipt: match step {
                Some(step) => ctx.try_output(step)?,
                None => None,
            },
            no_cars: t.no_cars,
        })
    }
}

impl Example for TravelSaga {
    type Input = Trip;

    const PROGRAM: &'static str = "travel-saga";

    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec {
            service: "flights",
            command: "book_flight",
            fails_when: None,
        },
        CommandSpec {
            service: "flights",
            command: "cancel_flight",
            fails_when: None,
        },
        CommandSpec {
            service: "hotels",
            command: "book_hotel",
            fails_when: None,
        },
        CommandSpec {
            service: "hotels",
            command: "cancel_hotel",
            fails_when: None,
        },
        CommandSpec {
            service: "cars",
            command: "rent_car",
            fails_when: Some("no_cars"),
        },
        CommandSpec {
            service: "cars",
            command: "cancel_car",
            fails_when: None,
        },
        CommandSpec {
            service: "booking",
            command: "confirm",
            fails_when: None,
        },
    ];

    fn definition() -> SagaDefinition<Trip> {
        let mut b = SagaDefinition::<Trip>::builder("travel", 1);
        for (step, service, book, cancel) in [
            ("flight", "flights", "book_flight", "cancel_flight"),
            ("hotel", "hotels", "book_hotel", "cancel_hotel"),
            ("car", "cars", "rent_car", "cancel_car"),
        ] {
            b = b.step(step, move |s| {
                s.action(service, book, booking(None))
                    .compensation(service, cancel, booking(Some(step)))
                    .retry(retry())
                    .timeout(step_timeout())
            });
        }
        b.step("confirm", |s| {
            s.pivot()
                .action("booking", "confirm", booking(None))
                .retry(retry())
                .timeout(step_timeout())
        })
        .build()
        .expect("the travel saga is valid")
    }

    fn input(n: u64, fail: bool) -> Trip {
        const PLACES: [&str; 4] = ["Lisbon", "Kyoto", "Oaxaca", "Tromsø"];
        Trip {
            trip_no: n,
            destination: PLACES[(n % 4) as usize].to_owned(),
            nights: 2 + (n % 5) as u32,
            no_cars: fail,
        }
    }
}
